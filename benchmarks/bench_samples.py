"""What samples while training cost: their share of the time between two evaluations.

A 124M-shape GPT-2 (random weights: the cost does not depend on them) trains with train.py's CPU
defaults (4 x 128 tokens per step, an evaluation of 4,096 tokens every 50 steps) and the default
samples (the two default prompts, 32 new tokens each). Training steps, evaluations and sample
draws take turns, so a busy machine slows them alike; each figure is the median of its turns.

    python benchmarks/bench_samples.py                  # CPU defaults
    python benchmarks/bench_samples.py --rounds 5 --eval-every 50 --sample-tokens 32

The last line is the samples' share of the time from one evaluation to the next.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.io.tokenizer import load_tokenizer
from minigpt2.training.data import TokenFile
from minigpt2.training.trainer import TrainConfig, Trainer
from minigpt2.training.watch import DEFAULT_SAMPLE_PROMPTS, PromptSampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="turns of (steps, evaluation, samples)")
    p.add_argument("--steps-per-round", type=int, default=3, help="training steps timed per turn")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--tokenizer", default="gpt2", help="where vocab.json + merges.txt come from")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 small's shape
    config = TrainConfig(steps=10_000, batch_size=4, seq_len=128, eval_tokens=args.eval_tokens, warmup=0)
    enc = load_tokenizer(args.tokenizer)
    sampler = PromptSampler(enc, DEFAULT_SAMPLE_PROMPTS, args.sample_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, n in (("train", 200_000), ("val", 20_000)):
            tokens = np.random.default_rng(len(name)).integers(0, 50257, n, dtype=np.uint16)
            tokens.tofile(Path(tmp) / f"{name}.bin")
            files.append(TokenFile(Path(tmp) / f"{name}.bin", chars=n))
        trainer = Trainer(model, files[0], {"val": files[1]}, config, Path(tmp) / "run")
        steps, evals, samples = [], [], []
        for _ in range(args.rounds):
            for _ in range(args.steps_per_round):
                steps.append(trainer.train_step()["step_s"])
            started = time.perf_counter()
            for _ in trainer.evaluate():
                pass
            evals.append(time.perf_counter() - started)
            samples.append(sampler.draw(trainer.raw_model, trainer.step, trainer.tokens)["seconds"])
    step, evaluation, sample = (statistics.median(x) for x in (steps, evals, samples))
    between = args.eval_every * step + evaluation + sample
    print(f"threads {torch.get_num_threads()}; medians of {args.rounds} turns")
    print(f"training step (4 x 128 tokens): {step:.3f} s; evaluation ({args.eval_tokens} tokens): {evaluation:.2f} s")
    print(f"samples ({len(DEFAULT_SAMPLE_PROMPTS)} prompts x {args.sample_tokens} new tokens): {sample:.2f} s")
    print(f"samples: {100 * sample / between:.2f}% of the time between two evaluations ({args.eval_every} steps)")


if __name__ == "__main__":
    main()
