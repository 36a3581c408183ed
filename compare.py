"""Show what fine-tuning changed in a GPT-2, where, and what it cost.

    python compare.py gpt2 runs/zh/final
    python compare.py gpt2 runs/zh --prompt "今天的天气" --text zh/鲁迅小说集.txt --text en/sherlock.txt \\
        --json compare.json --plot compare.png
    python compare.py runs/zh                      # a run alone: from its starting model to its final one
    python compare.py runs/zh --prompt "他走进屋里" --html report.html   # one page to open anywhere, or share
    python compare.py base runs/full runs/lora4 --text zh.txt --text en.txt --plot tradeoff.png   # several
    python compare.py gpt2 runs/zh --text zh.txt --layer-tokens 2048   # which units carry the change, where

A (the first argument) is the reference, usually the model before fine-tuning; B the one after.
Each is anything --model takes in sample.py (a name, a hub repo id, a checkpoint directory, a
.safetensors file) or a training run directory, which stands for its final checkpoint and adds
its drift over the training steps. With several B's, one table (and plot) of what each learned
on the first --text and lost on the second: a trade-off, e.g. full fine-tuning against LoRA.
With one B, each --text also gets the transplants (each unit of B in A, of A in B: 2 x (L + 2)
evaluations of its first --layer-tokens tokens), the logit lens and the passages B gained and
lost most on; --no-layers skips the first two.
"""

from minigpt2.cli import run_script, start_script  # light: nothing below is imported yet

if __name__ == "__main__":
    start_script()  # first: Ctrl-C during the imports exits cleanly; closed or narrow streams work

import argparse  # noqa: E402
import sys  # noqa: E402

from minigpt2.analysis import DEFAULT_LAYER_TOKENS, DEFAULT_MAX_EVAL_TOKENS  # noqa: E402
from minigpt2.checks import MAX_NEW_TOKENS, ArgumentParser, arg_int, text_arg  # noqa: E402
from minigpt2.training.options import SAMPLE_TOKENS  # noqa: E402


# fmt: off
def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="model A, the reference (before): a model source or a training run directory")
    p.add_argument("b", nargs="*", help="model B (after); omit it when A is a run, to compare the run's start and "
                   "end; several: a trade-off table of them all against A")
    p.add_argument("--prompt", action="append", default=[], type=text_arg, metavar="TEXT",
                   help="compare the block activations and next-token predictions on this prompt (repeatable)")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="loss, perplexity and bits per character of A and B on this UTF-8 text file (repeatable)")
    p.add_argument("--max-eval-tokens", type=arg_int(low=1), default=DEFAULT_MAX_EVAL_TOKENS, metavar="N",
                   help=f"evaluate at most the first N tokens of each --text (default: {DEFAULT_MAX_EVAL_TOKENS})")
    p.add_argument("--window", type=arg_int(low=1), metavar="N", help="score --text in windows of N tokens (default: "
                   "each model's context; a training run's log used its --seq-len)")
    p.add_argument("--top", type=arg_int(low=0), default=10, metavar="N", help="how many of the most changed tensors "
                   "to list (default: 10)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--plot", metavar="PATH.png", help="also draw the learning curves, heatmap and drift into this PNG "
                   "(needs matplotlib)")
    p.add_argument("--html", metavar="PATH.html", help="also write everything into one self-contained HTML page "
                   "(no network needed; readable on a phone)")
    p.add_argument("--sample-tokens", type=arg_int(low=0, high=MAX_NEW_TOKENS), default=SAMPLE_TOKENS, metavar="N",
                   help=f"continue each --prompt by N tokens with A and with B, the same seed for both (default: "
                        f"{SAMPLE_TOKENS}; 0: no continuations)")
    p.add_argument("--layer-tokens", type=arg_int(low=1), default=DEFAULT_LAYER_TOKENS, metavar="N",
                   help=f"the transplants and the logit lens read the first N tokens of each --text (default: "
                        f"{DEFAULT_LAYER_TOKENS}; they cost 2 x (L + 2) evaluations and 2 x (L + 1) read-outs of it)")
    p.add_argument("--no-layers", action="store_true", help="skip the transplants and the logit lens: a quick look")
    p.add_argument("--force", action="store_true", help="replace existing --json / --plot / --html files")
    p.add_argument("--device", default="cpu",
                   help="where the forward passes for --prompt and --text run: cpu, cuda, mps or auto (default: cpu); "
                        "weights are always compared on the CPU in float64")
    p.add_argument("--revision", help="a branch, tag or commit, for hub models")
    p.add_argument("--quantize", choices=["int8"], help="run --prompt and --text through int8 weight-only models: "
                   "the figures int8 decoding would give (not faster: whole texts are bound by arithmetic)")
    return p
# fmt: on


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from minigpt2.analysis.compare import compare, compare_many
    from minigpt2.analysis.outputs import check_request, write_outputs
    from minigpt2.analysis.report import render, render_many
    from minigpt2.console import PhaseProgress

    def body() -> int:
        check_request(args)  # before minutes of work: options that do nothing, outputs that cannot be written
        progress = PhaseProgress()
        common = dict(texts=args.text, device=args.device, max_eval_tokens=args.max_eval_tokens, progress=progress,
                      revision=args.revision, quantize=args.quantize, window=args.window)  # fmt: skip
        try:
            if len(args.b) > 1:
                result = compare_many(args.a, args.b, **common)
                report = render_many(result)
            else:
                b = args.b[0] if args.b else None
                result = compare(args.a, b, prompts=args.prompt, sample_tokens=args.sample_tokens,
                                 layers=not args.no_layers, layer_tokens=args.layer_tokens, **common)  # fmt: skip
                report = render(result, top=args.top)
        finally:
            progress.finish()  # also on an error: its one line must not be followed by a progress line
        sys.stdout.write(report)
        for line in write_outputs(result, args, progress):
            print(line)
        return 0

    return run_script(body)


if __name__ == "__main__":
    sys.exit(main())
