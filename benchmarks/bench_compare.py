"""How long `compare.py` takes on two 124M-parameter checkpoints, and how much memory.

    python benchmarks/bench_compare.py [--dir DIR] [--eval-tokens N] [--quick]

Two GPT-2 (124M) checkpoints are made from random weights (B = A plus a low-rank update and a
little noise on every matrix, like a fine-tune) and compared twice, each in a fresh process so
that its peak resident memory is its own:

- ours: `minigpt2.analysis.compare.compare_weights`, streaming one pair of tensors at a time from the
  safetensors files, in float64, singular values from the Gram matrix (min(shape)^2).
- naive: what one writes first: both models loaded whole with transformers'
  `GPT2LMHeadModel.from_pretrained`, then for each tensor the five plain metrics and a full
  `torch.linalg.svdvals` of the difference in float32.

Both compute the same figures (rank for 90% energy, stable rank, relative change); the script
checks that they agree. Then the time ratio naive / ours. Needs transformers (the test extra)
for the naive side.

Then the per-text sections of `--text` (`minigpt2.analysis.causal`), in a third process on the
same two checkpoints and the first N tokens (`--eval-tokens`, default 1024) of a Chinese test
text: one plain evaluation (the behaviour table's, per model), the per-token losses, the logit
lens of one model (L + 1 read-outs) and the transplants (2 x (L + 2) evaluations), each timed,
with the cost per 32,768 tokens (compare.py's default --max-eval-tokens) extrapolated linearly.
`--quick`: the sections alone, on 256 tokens (no naive side).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_checkpoints(directory: Path) -> tuple[Path, Path]:
    import torch

    from minigpt2 import GPT, PRESETS, save_model

    a, b = directory / "a", directory / "b"
    if (a / "model.safetensors").exists() and (b / "model.safetensors").exists():
        return a, b
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt2"])
    save_model(model, a, overwrite=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # a rank-4 update, as fine-tuning tends to make, plus noise
                u = torch.randn(p.shape[0], 4, generator=g)
                v = torch.randn(4, p.shape[1], generator=g)
                p.add_(1e-3 * (u @ v) / 2 + 1e-4 * torch.randn(p.shape, generator=g))
            else:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    save_model(model, b, overwrite=True)
    return a, b


def run_ours(a: str, b: str) -> dict:
    from minigpt2.analysis.compare import compare_weights

    start = time.perf_counter()
    weights = compare_weights(a, b)
    seconds = time.perf_counter() - start
    figures = {t["name"]: [t["relative_change"], t["stable_rank"], t["rank_90"]] for t in weights["tensors"]}
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "figures": figures}


def run_naive(a: str, b: str) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    start = time.perf_counter()
    sa = GPT2LMHeadModel.from_pretrained(a).state_dict()
    sb = GPT2LMHeadModel.from_pretrained(b).state_dict()
    figures = {}
    for key, ta in sa.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(("attn.bias", "attn.masked_bias")):
            continue
        tb = sb[key]
        diff = ta - tb
        _ = diff.abs().mean().item(), diff.abs().max().item(), diff.std().item()
        if ta.dim() == 2:
            _ = (
                torch.nn.functional.cosine_similarity(ta, tb, dim=1).mean().item(),
                torch.norm(diff, dim=1).mean().item(),
            )
            s2 = torch.linalg.svdvals(diff) ** 2
            energy = s2.sum()
            rank = int((torch.cumsum(s2, 0) >= 0.9 * energy).nonzero()[0]) + 1
            stable = (energy / s2[0]).item()
        else:
            rank = stable = None
        figures[name] = [(diff.norm() / ta.norm()).item(), stable, rank]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "figures": figures}


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a machine other jobs share, the CPU time is
    what the work itself took, the wall time what it took there and then."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def run_layers(a: str, b: str, tokens: str) -> dict:
    import torch

    from minigpt2.analysis.causal import Transplanter, layer_attribution, logit_lens, score_with_tokens
    from minigpt2.io.tokenizer import load_tokenizer
    from minigpt2.io.weights import load_model
    from minigpt2.model.evaluate import char_counts, score_text, text_stream

    enc = load_tokenizer("gpt2")
    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "zh" / "红楼梦.txt").read_text(encoding="utf-8")
    stream, _ = text_stream(enc, text, int(tokens))
    chars = char_counts(enc)
    model_a, model_b = load_model(a), load_model(b)
    times = {}
    with torch.inference_mode():
        score_text(model_b, stream, chars)  # warm-up: the first pass of a process pays for allocations
        start = clock()
        plain = score_text(model_a, stream, chars)
        times["one evaluation"] = since(start)
        start = clock()
        score_with_tokens(model_a, stream, chars)
        times["one evaluation with per-token losses"] = since(start)
        start = clock()
        lens = logit_lens(model_a, stream, chars)
        times[f"logit lens of one model ({len(lens)} read-outs)"] = since(start)
        start = clock()
        lab = Transplanter(model_a, model_b)
        times["transplants: copies of both models' weights"] = since(start)
        start = clock()
        rows = layer_attribution(lab, None, stream, chars)
        times[f"transplants ({2 * len(rows)} evaluations)"] = since(start)
    assert abs(lens[-1] - plain.bits_per_char) < 1e-5
    threads = torch.get_num_threads()
    return {"seconds": times, "tokens": len(stream) - 1, "peak_rss_mb": peak_rss_mb(), "threads": threads}


def print_layers(found: dict) -> None:
    per = 32768 / found["tokens"]
    one = found["seconds"]["one evaluation"][1]
    print(f"\nper-text sections on {found['tokens']:,} tokens of Chinese ({found['threads']} threads; "
          f"peak RSS {found['peak_rss_mb']:.0f} MB with both models loaded); wall s, CPU s, the CPU time in "
          "evaluations and per 32,768 tokens:")  # fmt: skip
    for what, (wall, cpu) in found["seconds"].items():
        if what.startswith("transplants: copies"):  # once per comparison, whatever the text's length
            print(f"  {what:46s} {wall:7.2f} s {cpu:7.2f} s  (once)")
            continue
        print(f"  {what:46s} {wall:7.2f} s {cpu:7.2f} s  = {cpu / one:5.1f} evaluations, {cpu * per / 60:6.1f} "
              "CPU-min per 32,768 tokens")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="keep the two checkpoints here (made once, reused on later runs)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens of text for the per-text sections")
    p.add_argument("--quick", action="store_true", help="the per-text sections alone, on 256 tokens")
    p.add_argument("--impl", choices=["ours", "naive", "layers"], help=argparse.SUPPRESS)  # the child processes
    p.add_argument("checkpoints", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        result = {"ours": run_ours, "naive": run_naive, "layers": run_layers}[args.impl](*args.checkpoints)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        a, b = make_checkpoints(directory)
        results = {}
        tokens = str(256 if args.quick else args.eval_tokens)
        for impl in ("layers",) if args.quick else ("ours", "naive", "layers"):
            extra = [tokens] if impl == "layers" else []
            child = subprocess.run([sys.executable, __file__, "--impl", impl, str(a), str(b), *extra],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            results[impl] = json.loads(child.stdout.strip().splitlines()[-1])
    if args.quick:
        print_layers(results["layers"])
        return 0

    ours, naive = results["ours"], results["naive"]
    # Zero-initialised biases have an infinite relative change in both; compare the finite ones.
    gaps = [
        (abs(ours["figures"][n][0] - naive["figures"][n][0]) / naive["figures"][n][0], n)
        for n in naive["figures"]
        if 0 < naive["figures"][n][0] < float("inf")
    ]
    worst, worst_name = max(gaps)
    ranks_agree = all(ours["figures"][n][2] == naive["figures"][n][2] for n in naive["figures"])
    print("two GPT-2 (124M) checkpoints, weights only, every tensor incl. singular values")
    print(
        f"ours  (streamed, float64, Gram eigenvalues): {ours['seconds']:6.2f} s, peak RSS {ours['peak_rss_mb']:7.0f} MB"
    )
    print(
        f"naive (transformers, float32 full svdvals):  {naive['seconds']:6.2f} s, "
        f"peak RSS {naive['peak_rss_mb']:7.0f} MB"
    )
    print(
        f"agreement: relative change within {worst:.1e} (largest on {worst_name}: the naive float32 norm over all "
        f"its entries loses digits); rank-90% {'identical' if ranks_agree else 'DIFFERS'} on all tensors"
    )
    print(f"time ratio naive/ours: {naive['seconds'] / ours['seconds']:.2f}x")
    print_layers(results["layers"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
