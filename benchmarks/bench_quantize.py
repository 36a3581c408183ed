"""Quality of int8 weight-only quantization on a *trained* GPT-2, on held-out text.

Random weights say little about quantization error: their logits are nearly flat and their
weights have no outlier channels. So this script trains a small GPT-2 (4 layers, width 256,
context 128, the GPT-2 tokenizer) for a few hundred CPU steps on the four classic novels, or
takes a trained checkpoint (--model), then compares float32 with every quantization variant on
鲁迅小说集 (never trained on):

    perplexity and its change, relative logits error ||int8 - fp32|| / ||fp32||, and top-1
    agreement (share of positions where both models' most likely next token is the same).

Variants: minigpt2's default `quantize="int8"` (every linear layer int8, the output layer
included, activations refined to ~14 bits); the same with the output layer left float32; and
every layer fed 8-bit activations only, as `torch.ao.quantization.quantize_dynamic` does (CPU
only). Every variant runs through the kernel decoding uses (fbgemm's int8 GEMM), even for these
128-token windows, which outside this script go to a dequantized float matmul (see
`FBGEMM_MAX_ROWS`).

    MINIGPT2_SHARED_DATA=/work/shared/data python benchmarks/bench_quantize.py [--steps 300] [--save DIR]
    python benchmarks/bench_quantize.py --model DIR

The last line is the perplexity change of the default int8 model.
"""

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import minigpt2.model.quantize
from minigpt2 import GPT, GPTConfig, load_model, load_tokenizer, save_model
from minigpt2.model.evaluate import char_counts, score_text, spans, text_stream
from minigpt2.model.quantize import Int8Linear, quantize_model
from minigpt2.training.data import prepare_corpus
from minigpt2.training.trainer import TrainConfig, Trainer

TRAIN_NOVELS = ("红楼梦.txt", "西游记.txt", "水浒传.txt", "三国演义.txt")
HELD_OUT = "鲁迅小说集.txt"


def train_small(data: Path, steps: int, batch_size: int, enc) -> GPT:
    """A 4-layer, width-256 GPT-2 trained for `steps` steps of batch_size x 128 tokens on the novels."""
    corpus = prepare_corpus([data / "zh" / name for name in TRAIN_NOVELS], enc)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, n_positions=128, dropout=0.0))
    config = TrainConfig(steps=steps, batch_size=batch_size, seq_len=128, lr=2e-3, eval_every=0, eval_tokens=4096)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, corpus.train, {}, config, Path(tmp) / "run", tokenizer_source=data / "gpt2")
        start = time.perf_counter()
        for record in trainer.run():
            if record.get("type") == "train" and (record["step"] % 25 == 0 or record["step"] == steps):
                print(f"  step {record['step']}: loss {record['loss']:.3f}", flush=True)
        print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def held_out(data: Path, enc, n_positions: int, max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Lu Xun's text as minigpt2.model.evaluate scores it (EOT, then its first `max_tokens` tokens), and
    its full context windows as (windows, n_positions + 1) token rows, for comparing logits."""
    stream, _ = text_stream(enc, (data / "zh" / HELD_OUT).read_text(encoding="utf-8"), max_tokens)
    rows = [stream[s : s + n + 1] for s, n in spans(len(stream), n_positions) if n == n_positions]
    return stream, torch.tensor(rows)  # (W, T + 1)


@torch.inference_mode()
def window_logits(model: GPT, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Logits (W, T, vocab) for every window."""
    return torch.cat([model(windows[i : i + batch, :-1]) for i in range(0, len(windows), batch)])


def variants(model: GPT) -> dict[str, GPT]:
    default = quantize_model(copy.deepcopy(model))
    float_head = quantize_model(copy.deepcopy(model), lm_head=False)
    act8 = quantize_model(copy.deepcopy(model))
    for m in act8.modules():
        if isinstance(m, Int8Linear):
            m.refine_activations = False
    return {
        "int8 (default: blocks and output layer)": default,
        "int8 blocks, output layer float32": float_head,
        "int8, 8-bit activations (quantize_dynamic-like)": act8,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained checkpoint to measure instead of training one")
    p.add_argument("--steps", type=int, default=300, help="training steps for the small model (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="windows of 128 tokens per training step (default 8)")
    p.add_argument("--save", help="save the trained small model here (reuse it with --model)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens to evaluate (default 8192)")
    args = p.parse_args()
    data = Path(os.environ.get("MINIGPT2_SHARED_DATA", ""))
    if not (data / "zh" / HELD_OUT).is_file():
        print("error: set MINIGPT2_SHARED_DATA to the shared data folder (with zh/ and gpt2/)", file=sys.stderr)
        return 1
    torch.set_grad_enabled(False)
    enc = load_tokenizer(data / "gpt2")
    if args.model:
        model = load_model(args.model)
    else:
        with torch.enable_grad():
            model = train_small(data, args.steps, args.batch_size, enc)
        if args.save:
            save_model(model, args.save, tokenizer_source=data / "gpt2", overwrite=True)
    c = model.config
    stream, windows = held_out(data, enc, c.n_positions, args.eval_tokens)
    counts = char_counts(enc)
    ref_score = score_text(model, stream, counts)
    print(
        f"model: {c.n_layer} layers, width {c.n_embd}, context {c.n_positions}, {model.num_params():,} params; "
        f"held-out: {HELD_OUT}, {ref_score.protocol()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    ref = window_logits(model, windows)
    minigpt2.model.quantize.FBGEMM_MAX_ROWS = 1 << 30  # measure the decoding kernel's numbers on every window
    print(f"{'float32':50s} perplexity {ref_score.perplexity:9.3f}")
    changes = {}
    for name, m in variants(model).items():
        logits, score = window_logits(m, windows), score_text(m, stream, counts)
        rel = ((logits - ref).norm() / ref.norm()).item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        changes[name] = score.perplexity / ref_score.perplexity - 1
        print(
            f"{name:50s} perplexity {score.perplexity:9.3f} ({changes[name]:+.2%}); "
            f"logits error {rel:.2%}; top-1 agreement {top1:.2%}"
        )
    default = next(iter(changes))
    print(f"perplexity change int8 / float32 on {HELD_OUT}: {changes[default]:+.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
