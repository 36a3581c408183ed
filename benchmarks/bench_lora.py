"""LoRA vs full fine-tuning of the 124M shape: step time and the size of the resumable state.

Three contestants get the same random 124M-shape weights and the same token windows:

- minigpt2 full:  `Trainer.train_step` over every weight (AdamW over 124M numbers);
- minigpt2 LoRA:  the same Trainer after `apply_lora(model, r)` on all four linear layers of
                  every block (AdamW over the adapters only);
- transformers + PEFT LoRA: `get_peft_model(GPT2LMHeadModel, LoraConfig(r, same alpha, same
                  targets, fan_in_fan_out=True))`, forward with labels, backward, clipping at 1.0,
                  torch's AdamW over the trainable parameters.

Steps alternate between the contestants (the order rotating), so a busy machine slows all
alike; medians give tokens/s. Each step is timed twice: wall clock, and the CPU time of this
process (time.process_time()). With `--threads 1` the CPU time is what one core spends on the
step whatever else the machine runs (on a quiet core it equals the wall time): the figure to
compare between machines and runs, where wall times on a shared machine are not. Then each
minigpt2 trainer saves a checkpoint and the size of its trainer_state.* (what --resume reads:
optimizer moments, RNG, and for LoRA the adapters) is reported, with the adapter/ folder and the
optimizer-state estimate of `lora_summary`.

    python benchmarks/bench_lora.py                 # CPU, 4x128, r=8
    python benchmarks/bench_lora.py --threads 1     # CPU seconds per step, comparable under load
    python benchmarks/bench_lora.py --rank 16 --shape 8x256 --device cuda --dtype bfloat16

The last line: LoRA's step time (wall and CPU) and state size relative to full fine-tuning, and
minigpt2's LoRA step time relative to PEFT's.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPTConfig
from minigpt2.device import resolve_dtype
from minigpt2.model.lora import DEFAULT_ALPHA, TARGETS, apply_lora, lora_summary
from minigpt2.training.data import TokenFile
from minigpt2.training.rundir import STATE_JSON, STATE_TENSORS
from minigpt2.training.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import same_weights, transformers_model  # noqa: E402
from plain_gpt2 import optimizer_step  # noqa: E402


def peft_step_fn(hf, trainer, r, device, dtype):
    """One training step of transformers + PEFT LoRA, on the windows minigpt2 trains on at step i."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        hf,
        LoraConfig(
            r=r,
            lora_alpha=DEFAULT_ALPHA,
            target_modules=list(TARGETS),
            fan_in_fan_out=True,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(i):
        x, _ = trainer.batch(i)
        optimizer_step(lambda: model(input_ids=x, labels=x).loss, params, opt, device, dtype)

    return step, sum(p.numel() for p in params)


def state_bytes(checkpoint: Path) -> int:
    return sum((checkpoint / name).stat().st_size for name in (STATE_TENSORS, STATE_JSON))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x128", help="BxT (default 4x128)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 makes CPU time comparable")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    B, T = map(int, args.shape.split("x"))
    config = GPTConfig.from_preset("gpt2", dropout=0.0)
    print(
        f"device {device}, autocast {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"shape {args.shape}, LoRA r={args.rank} alpha={DEFAULT_ALPHA:g} on {', '.join(TARGETS)}"
    )

    hf = transformers_model(config, device)
    full_model = same_weights(hf, config)
    lora_model = apply_lora(copy.deepcopy(full_model), args.rank, seed=0)
    summary = lora_summary(lora_model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, 200_000, dtype=np.uint16)
        tokens.tofile(tmp / "tokens.bin")
        data = TokenFile(tmp / "tokens.bin", chars=len(tokens))
        train = TrainConfig(steps=10_000, batch_size=B, seq_len=T, lr=1e-4, warmup=0)
        trainers = {
            name: Trainer(model, data, {}, train, tmp / name, device=device, dtype=dtype)
            for name, model in (("minigpt2 full", full_model), ("minigpt2 LoRA", lora_model))
        }
        peft_step, peft_trainable = peft_step_fn(hf, trainers["minigpt2 full"], args.rank, device, dtype)
        assert peft_trainable == summary["trainable_params"], (peft_trainable, summary["trainable_params"])

        def ours(trainer):
            def step(i):
                trainer.step = i
                trainer.train_step()

            return step

        steps = {name: ours(t) for name, t in trainers.items()} | {"PEFT LoRA": peft_step}
        times = {name: [] for name in steps}
        cpu = {name: [] for name in steps}
        names = list(steps)
        for i in range(args.warmup + args.steps):
            for name in names[i % 3 :] + names[: i % 3]:  # rotate who goes first
                start, cpu_start = time.perf_counter(), time.process_time()
                steps[name](i)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
        for name, ts in times.items():
            print(
                f"{name:<14} {statistics.median(ts):7.3f} s/step  {B * T / statistics.median(ts):8,.1f} tokens/s "
                f"(median of {args.steps}; best {min(ts):.3f} s); CPU {statistics.median(cpu[name]):7.3f} s/step"
            )

        print(
            f"trainable: LoRA {summary['trainable_params']:,} of {summary['total_params']:,} "
            f"({100 * summary['trainable_share']:.2f}%); full {full_model.num_params():,}"
        )
        print(
            f"AdamW moments (8 bytes per trainable number): LoRA {mib(summary['optimizer_state_bytes'])}, "
            f"full {mib(summary['full_optimizer_state_bytes'])}"
        )
        sizes = {}
        for name, trainer in trainers.items():
            trainer.step = args.warmup + args.steps
            ckpt = trainer.save_checkpoint()
            sizes[name] = state_bytes(ckpt)
            adapter = f", adapter/ {mib(folder_bytes(ckpt / 'adapter'))}" if (ckpt / "adapter").is_dir() else ""
            print(
                f"{name:<14} trainer_state.* {mib(sizes[name])}, model.safetensors "
                f"{mib((ckpt / 'model.safetensors').stat().st_size)}{adapter}"
            )

    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    print(
        f"LoRA r={args.rank} / full: step time {med['minigpt2 LoRA'] / med['minigpt2 full']:.2f}x "
        f"(CPU time {med_cpu['minigpt2 LoRA'] / med_cpu['minigpt2 full']:.2f}x), "
        f"trainer_state {sizes['minigpt2 full'] / sizes['minigpt2 LoRA']:.0f}x smaller; "
        f"minigpt2 LoRA / PEFT LoRA step time {med['minigpt2 LoRA'] / med['PEFT LoRA']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
