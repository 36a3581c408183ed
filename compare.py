"""Show what fine-tuning changed in a GPT-2, where, and what it cost.

    python compare.py gpt2 runs/zh/final
    python compare.py gpt2 runs/zh --prompt "今天的天气" --text zh/鲁迅小说集.txt --text en/sherlock_holmes.txt \\
        --json compare.json --plot compare.png
    python compare.py runs/zh                      # a run alone: from its starting model to its final one

A (the first argument) is the reference, usually the model before fine-tuning; B the one after.
Each is anything --model takes in sample.py (a name, a hub repo id, a checkpoint directory, a
.safetensors file) or a training run directory, which stands for its final checkpoint and adds
its drift over the training steps.
"""

import argparse
import sys

from minigpt2 import MiniGPT2Error
from minigpt2.compare import DEFAULT_MAX_EVAL_TOKENS, compare
from minigpt2.report import check_new_file, render, require_matplotlib, write_json, write_plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="model A, the reference (before): a model source or a training run directory")
    p.add_argument("b", nargs="?", help="model B (after); omit it when A is a run, to compare the run's start and end")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="compare the block activations and next-token predictions on this prompt (repeatable)")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="loss, perplexity and bits per character of A and B on this UTF-8 text file (repeatable)")
    p.add_argument("--max-eval-tokens", type=int, default=DEFAULT_MAX_EVAL_TOKENS, metavar="N",
                   help=f"evaluate at most the first N tokens of each --text (default: {DEFAULT_MAX_EVAL_TOKENS})")
    p.add_argument("--top", type=int, default=10, metavar="N", help="how many of the most changed tensors to list (default: 10)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--plot", metavar="PATH.png", help="also draw the heatmap and drift curves into this PNG (needs matplotlib)")
    p.add_argument("--force", action="store_true", help="replace existing --json / --plot files")
    p.add_argument("--device", default="cpu",
                   help="where the forward passes for --prompt and --text run: cpu, cuda, mps or auto (default: cpu); "
                        "weights are always compared on the CPU in float64")
    p.add_argument("--revision", help="a branch, tag or commit, for hub models")
    p.add_argument("--quantize", choices=["int8"],
                   help="run --prompt and --text through int8 weight-only models: the figures int8 decoding would give "
                        "(not faster here: whole texts are bound by arithmetic, not by reading weights)")
    args = p.parse_args(argv)
    if args.top < 0:
        p.error("--top must be 0 or more")
    if args.max_eval_tokens < 1:
        p.error("--max-eval-tokens must be 1 or more")

    try:
        # Refuse existing output files before spending minutes on the comparison.
        for path in (args.json, args.plot):
            if path:
                check_new_file(path, args.force)
        if args.plot:
            require_matplotlib()
        result = compare(args.a, args.b, prompts=args.prompt, texts=args.text, device=args.device,
                         max_eval_tokens=args.max_eval_tokens, revision=args.revision,
                         quantize=args.quantize)
        sys.stdout.write(render(result, top=args.top))
        if args.json:
            print(f"wrote {write_json(result, args.json, force=args.force)}")
        if args.plot:
            print(f"wrote {write_plot(result, args.plot, force=args.force)}")
    except MiniGPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
